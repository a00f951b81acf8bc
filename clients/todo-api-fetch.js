// todo-api-fetch.js: call todo-api with a Better Auth JWT.
// The README quotes this file and the browser tests run it, so the two cannot drift.

/**
 * @param {{ baseUrl: string, getToken: () => Promise<string> }} options
 *   `getToken` returns a fresh JWT, e.g. from Better Auth's `authClient.token()`.
 */
export function createApiFetch({ baseUrl, getToken }) {
  let token = null; // the current JWT; Better Auth's last 15 minutes
  let pending = null; // one refresh at a time, shared by concurrent calls

  function refresh() {
    pending ??= getToken()
      .then((fresh) => (token = fresh))
      .finally(() => {
        pending = null;
      });
    return pending;
  }

  async function send(path, init, jwt) {
    const headers = new Headers(init.headers);
    headers.set("Authorization", `Bearer ${jwt}`);
    if (init.body !== undefined && !headers.has("Content-Type")) {
      headers.set("Content-Type", "application/json");
    }
    return fetch(baseUrl + path, { ...init, headers });
  }

  /** fetch() for the API: a 401 gets one fresh token and one retry, then is returned. */
  return async function apiFetch(path, init = {}) {
    const jwt = token ?? (await refresh());
    const response = await send(path, init, jwt);
    if (response.status !== 401) return response;
    // Sent with a token already replaced: retry with the current one, without a refresh.
    return send(path, init, token !== jwt ? token : await refresh());
  };
}

/** The problem+json body of an error response: branch on `problem.type`. */
export async function readProblem(response) {
  const type = response.headers.get("Content-Type") ?? "";
  if (!type.startsWith("application/problem+json")) {
    return { type: "about:blank", status: response.status, title: response.statusText };
  }
  return response.json();
}

/** The path of a list's next page (for apiFetch), from its `Link: <...>; rel="next"`. */
export function nextPage(response) {
  const link = response.headers.get("Link") ?? "";
  const match = /<([^>]+)>;\s*rel="next"/.exec(link);
  if (!match) return null;
  const url = new URL(match[1]);
  return url.pathname + url.search;
}
