// better-auth-client-check.mjs: the README's client side, run by tests/browser/test_better_auth.py
// against a real Better Auth (better-auth-server.mjs) and the API: Better Auth's own client with
// `jwtClient()`, whose `authClient.token()` feeds the README's wrapper, todo-api-fetch.js, as is.
//
//   BETTER_AUTH_URL=... API_URL=... EMAIL=... PASSWORD=... node better-auth-client-check.mjs
//
// Signs up, creates a task and lists the tasks; prints one JSON line of what it saw.
// (`better-auth/client` is what `better-auth/react` wraps; Node has no cookie jar, so the
// session cookie is kept here, as a browser would keep it.)
import { createAuthClient } from "better-auth/client";
import { jwtClient } from "better-auth/client/plugins";
import { createApiFetch, readProblem } from "./todo-api-fetch.js";

const { BETTER_AUTH_URL, API_URL, EMAIL, PASSWORD } = process.env;
let cookie = "";
const authClient = createAuthClient({
  baseURL: BETTER_AUTH_URL,
  plugins: [jwtClient()],
  fetchOptions: {
    onRequest: (ctx) => {
      ctx.headers.set("Origin", BETTER_AUTH_URL); // as a browser on the frontend's origin sends
      if (cookie) ctx.headers.set("Cookie", cookie);
    },
    onResponse: (ctx) => {
      const set = ctx.response.headers.getSetCookie();
      if (set.length) cookie = set.map((c) => c.split(";")[0]).join("; ");
    },
  },
});

const { data: signedUp, error } = await authClient.signUp.email({
  email: EMAIL,
  password: PASSWORD,
  name: "Client Check",
});
if (error) throw new Error(`sign-up failed: ${JSON.stringify(error)}`);

let tokens = 0; // how many times the wrapper asked Better Auth for a JWT
const apiFetch = createApiFetch({
  baseUrl: API_URL,
  getToken: async () => {
    const { data, error } = await authClient.token(); // the README's getToken, verbatim
    if (error || !data) throw new Error("not signed in");
    tokens += 1;
    return data.token;
  },
});

const tasks = `/api/${signedUp.user.id}/tasks`;
const created = await apiFetch(tasks, {
  method: "POST",
  body: JSON.stringify({ title: "Buy milk" }),
  headers: { "Idempotency-Key": crypto.randomUUID() },
});
const task = created.ok ? await created.json() : await readProblem(created);
const listed = await apiFetch(`${tasks}?status=all`);
const list = listed.ok ? await listed.json() : await readProblem(listed);

console.log(
  JSON.stringify({
    userId: signedUp.user.id,
    create: { status: created.status, task },
    list: { status: listed.status, total: listed.headers.get("X-Total-Count"), body: list },
    tokens,
  }),
);
