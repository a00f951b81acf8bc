// better-auth-server.mjs: a real Better Auth (the npm package, not a stand-in) with the `jwt`
// plugin, for tests/browser/test_better_auth.py: the API must verify the tokens Better Auth
// itself issues, for each algorithm the README says is supported.
//
//   BETTER_AUTH_SECRET=... [ALG=ES256] [PORT=0] [BETTER_AUTH_URL=...] node better-auth-server.mjs
//
// PORT 0 (the default) lets the OS choose; the server prints one JSON line, {"url": ...}, once
// it listens. BETTER_AUTH_URL defaults to that address: Better Auth's `baseURL`, hence the
// tokens' `iss` and `aud`. ALG is the jwt plugin's key algorithm (its default is EdDSA).
// Users, sessions and keys are in memory: each process starts empty, with a fresh key pair.
import http from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { toNodeHandler } from "better-auth/node";
import { jwt } from "better-auth/plugins";

const secret = process.env.BETTER_AUTH_SECRET;
if (!secret) throw new Error("set BETTER_AUTH_SECRET");

const server = http.createServer();
// Listen first, so that port 0's real port can go into baseURL before any request is served.
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  const address = server.address();
  const url = process.env.BETTER_AUTH_URL ?? `http://127.0.0.1:${address.port}`;
  const auth = betterAuth({
    baseURL: url,
    secret,
    database: memoryAdapter({ user: [], session: [], account: [], verification: [], jwks: [] }),
    emailAndPassword: { enabled: true },
    telemetry: { enabled: false },
    plugins: [jwt(process.env.ALG ? { jwks: { keyPairConfig: { alg: process.env.ALG } } } : {})],
  });
  server.on("request", toNodeHandler(auth));
  console.log(JSON.stringify({ url, alg: process.env.ALG ?? "EdDSA" }));
});

// The test stops it with SIGTERM: exit at once (open keep-alive sockets would hold close()).
process.on("SIGTERM", () => process.exit(0));
