-- wrk script: drives one of the service's operations, chosen by BENCH_OP, for the users listed
-- in BENCH_DATA (lines: user id <TAB> bearer token <TAB> first task id <TAB> number of tasks).
--   create  POST  /api/{user}/tasks                  a new task (due date, 2 tags) of a random user
--   list    GET   /api/{user}/tasks?limit=50         the first page of a random user's tasks
--   update  PUT   /api/{user}/tasks/{id}             a new title (always a real change)
--   toggle  PATCH /api/{user}/tasks/{id}/complete    flips the completion flag
-- Users and tasks are picked at random, so writes spread over many rows and chains.
local op = os.getenv("BENCH_OP") or error("BENCH_OP is not set")
local data = os.getenv("BENCH_DATA") or error("BENCH_DATA is not set")
-- A fresh nonce per run keeps every PUT title new: a PUT that changes nothing writes nothing.
local nonce = os.getenv("BENCH_NONCE") or tostring(os.time())

local users = {}
for line in io.lines(data) do
  local user, token, first, count = line:match("^([^\t]+)\t([^\t]+)\t(%d+)\t(%d+)$")
  if user then
    users[#users + 1] = {
      path = "/api/" .. user .. "/tasks",
      auth = "Bearer " .. token,
      first = tonumber(first),
      count = tonumber(count),
    }
  end
end
if #users == 0 then
  error("no users in " .. data)
end
math.randomseed(tonumber(nonce) or os.time())

local n = 0

local function task_path(u)
  return u.path .. "/" .. (u.first + math.random(0, u.count - 1))
end

request = function()
  n = n + 1
  local u = users[math.random(#users)]
  local headers = { ["Authorization"] = u.auth, ["User-Agent"] = "todo-api-bench/wrk" }
  if op == "create" then
    headers["Content-Type"] = "application/json"
    -- Like every seeded task: a priority, a due date and two of the user's ten tags.
    local k = math.random(0, 9)
    local body = '{"title":"bench task ' .. nonce .. "-" .. n
      .. '","description":"created by the benchmark","priority":"medium"'
      .. ',"due_at":"2027-01-' .. string.format("%02d", math.random(1, 28)) .. 'T09:00:00Z"'
      .. ',"tags":["tag' .. k .. '","tag' .. ((k + 3) % 10) .. '"]}'
    return wrk.format("POST", u.path, headers, body)
  elseif op == "list" then
    return wrk.format("GET", u.path .. "?limit=50", headers)
  elseif op == "update" then
    headers["Content-Type"] = "application/json"
    local body = '{"title":"bench title ' .. nonce .. "-" .. n .. '"}'
    return wrk.format("PUT", task_path(u), headers, body)
  elseif op == "toggle" then
    return wrk.format("PATCH", task_path(u) .. "/complete", headers)
  end
  error("unknown BENCH_OP " .. op)
end
