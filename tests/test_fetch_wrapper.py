"""The README's fetch wrapper, clients/todo-api-fetch.js, under node with a stand-in `fetch`:
how many tokens concurrent calls ask for, and which token each retry carries. (The browser
tests run it against the real API; these pin down its timing.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WRAPPER = Path(__file__).resolve().parent.parent / "clients" / "todo-api-fetch.js"
NODE = shutil.which("node")

# Tokens are "t1", "t2", ... in the order getToken hands them out; each takes `tokenMs`. The
# server refuses the tokens in `expired` with 401; the i-th call's answers take `delays[i]` ms.
SCENARIO = """
import { createApiFetch } from %(wrapper)s;

const { calls, delays, tokenMs, expired } = %(options)s;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let issued = 0;
const sent = calls.map(() => []);
globalThis.fetch = async (url, init) => {
  const i = Number(new URL(url).searchParams.get("i"));
  const jwt = init.headers.get("Authorization").replace("Bearer ", "");
  sent[i].push(jwt);
  await sleep(delays[i] ?? 0);
  return new Response(null, { status: expired.includes(jwt) ? 401 : 200 });
};
const apiFetch = createApiFetch({
  baseUrl: "http://api.test",
  getToken: async () => {
    issued += 1;
    const token = `t${issued}`;
    await sleep(tokenMs);
    return token;
  },
});
const responses = await Promise.all(calls.map((i) => apiFetch("/tasks?i=" + i)));
const statuses = responses.map((response) => response.status);
console.log(JSON.stringify({ issued, sent, statuses }));
"""


def run(**options: Any) -> dict[str, Any]:
    if NODE is None:
        # `make test` needs only Python; CI has node, and there a missing one is a failure.
        if os.environ.get("CI"):
            pytest.fail("node is not installed")
        pytest.skip("needs node")
    script = SCENARIO % {
        "wrapper": json.dumps(WRAPPER.as_uri()),
        "options": json.dumps(options),
    }
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_ten_parallel_calls_with_an_expired_token_share_one_refresh() -> None:
    # The 401s come back over 45 ms, a refresh takes 10: most arrive after it settled.
    out = run(calls=list(range(10)), delays=[5 * i for i in range(10)], tokenMs=10, expired=["t1"])
    assert out["statuses"] == [200] * 10
    assert out["issued"] == 2  # the first token, then exactly one more
    assert out["sent"] == [["t1", "t2"]] * 10


def test_a_401_for_a_token_already_replaced_retries_with_the_current_one() -> None:
    # Call 0 is slow: its 401 (for t1) arrives after call 1's 401 got t2. It must not ask for
    # a third token: t1 is no longer the current one, so it retries with t2.
    out = run(calls=[0, 1], delays=[50, 0], tokenMs=5, expired=["t1"])
    assert out["statuses"] == [200, 200]
    assert out["issued"] == 2
    assert out["sent"] == [["t1", "t2"], ["t1", "t2"]]


def test_a_401_for_the_current_token_refreshes_once_and_retries_once() -> None:
    # t2 is refused too (the user signed out): one shared refresh, one retry each, and the
    # second 401 is returned.
    out = run(calls=[0, 1], delays=[0, 0], tokenMs=1, expired=["t1", "t2"])
    assert out["statuses"] == [401, 401]
    assert out["issued"] == 2
    assert out["sent"] == [["t1", "t2"], ["t1", "t2"]]
