// Compiled with `tsc --strict` against the types generated from /openapi.json: a change to
// the API that breaks a frontend's calls breaks this file. `calls` must name every operation
// (its type is keyed by the generated `operations`), so a new operation needs a call here.
import createClient from "openapi-fetch";
import type { components, operations, paths } from "./build/api";

type Task = components["schemas"]["TaskPublic"];
type Problem = components["schemas"]["Problem"];
type AuditAction = components["schemas"]["AuditAction"];

const api = createClient<paths>({ baseUrl: "http://127.0.0.1:8000" });
const user_id = "yQpAuYDoseUg1VTKga1kraePS02Q0sUC";
const task_id = 1;

function describe(problem: Problem): string {
  // Programs branch on `type`; `detail` is for people.
  const fields = (problem.errors ?? []).map((e) => `${e.field}: ${e.message}`);
  return `${problem.type} ${problem.status} ${problem.detail} ${fields.join("; ")}`;
}

function title(task: Task): string {
  return task.completed ? `[x] ${task.title}` : `[ ] ${task.title}`;
}

const calls: { [K in keyof operations]: () => Promise<unknown> } = {
  healthz: () => api.GET("/healthz"),
  readyz: () => api.GET("/readyz"),
  listTasks: async () => {
    const { data, error, response } = await api.GET("/api/{user_id}/tasks", {
      params: {
        path: { user_id },
        query: { status: "pending", sort: "title", order: "asc", limit: 50, offset: 0, q: "milk" },
      },
    });
    if (error) return describe(error);
    const total: number = Number(response.headers.get("X-Total-Count"));
    const next: string | null = response.headers.get("Link");
    return [data.map(title), total, next];
  },
  createTask: async () => {
    const { data, error, response } = await api.POST("/api/{user_id}/tasks", {
      params: { path: { user_id }, header: { "idempotency-key": "create-1" } },
      body: {
        title: "Buy milk",
        description: "Two litres",
        priority: "high",
        due_at: "2026-12-05T09:00:00+01:00",
        tags: ["errands"],
        recurrence: "FREQ=WEEKLY;BYDAY=SA",
        remind_at: "2026-12-05T08:30:00+01:00",
      },
    });
    if (error) return describe(error);
    const id: number = data.id;
    const tags: string[] = data.tags;
    return [id, tags, data.priority, response.headers.get("Location"), response.headers.get("ETag")];
  },
  getTask: async () => {
    const { data } = await api.GET("/api/{user_id}/tasks/{task_id}", {
      params: { path: { user_id, task_id } },
    });
    return data ? title(data) : null;
  },
  updateTask: async () => {
    const { data, error } = await api.PUT("/api/{user_id}/tasks/{task_id}", {
      params: { path: { user_id, task_id }, header: { "if-match": '"1-1"' } },
      body: { title: "Buy oat milk", description: null, completed: true },
    });
    return error ? describe(error) : data.updated_at;
  },
  deleteTask: async () => {
    const { error, response } = await api.DELETE("/api/{user_id}/tasks/{task_id}", {
      params: { path: { user_id, task_id }, header: { "if-match": '"1-2"' } },
    });
    return error ? describe(error) : response.status;
  },
  completeTask: async () => {
    const toggled = await api.PATCH("/api/{user_id}/tasks/{task_id}/complete", {
      params: { path: { user_id, task_id } },
    });
    const set = await api.PATCH("/api/{user_id}/tasks/{task_id}/complete", {
      params: { path: { user_id, task_id } },
      body: { completed: false },
    });
    return [toggled.data?.completed, set.data?.completed];
  },
  listTags: async () => {
    const { data } = await api.GET("/api/{user_id}/tags", { params: { path: { user_id } } });
    return data?.map((tag) => [tag.name, tag.task_count]);
  },
  listReminders: async () => {
    const { data, error } = await api.GET("/api/{user_id}/reminders", {
      params: { path: { user_id }, query: { state: "fired", limit: 20 } },
    });
    if (error) return describe(error);
    return data.map((r) => [r.task_id, r.title, r.remind_at, r.fired_at, r.late ? "late" : r.state]);
  },
  createTag: async () => {
    const { data, error } = await api.POST("/api/{user_id}/tags", {
      params: { path: { user_id } },
      body: { name: "Work" },
    });
    return error ? describe(error) : data?.id;
  },
  getTag: async () => {
    const { data } = await api.GET("/api/{user_id}/tags/{tag_id}", {
      params: { path: { user_id, tag_id: 1 } },
    });
    return data?.name;
  },
  renameTag: async () => {
    const { data, error } = await api.PATCH("/api/{user_id}/tags/{tag_id}", {
      params: { path: { user_id, tag_id: 1 } },
      body: { name: "Office" },
    });
    return error ? describe(error) : data.name;
  },
  deleteTag: async () => {
    const { error, response } = await api.DELETE("/api/{user_id}/tags/{tag_id}", {
      params: { path: { user_id, tag_id: 1 } },
    });
    return error ? describe(error) : response.status;
  },
  listAuditEvents: async () => {
    const action: AuditAction = "task.completed";
    const { data } = await api.GET("/api/{user_id}/audit-events", {
      params: { path: { user_id }, query: { action, limit: 10 } },
    });
    return data?.items.map((e) => [e.seq, e.action, e.before?.title, e.after?.completed]);
  },
  verifyAuditChain: async () => {
    const { data } = await api.GET("/api/{user_id}/audit-events/verify", {
      params: { path: { user_id } },
    });
    return data?.ok;
  },
  taskHistory: async () => {
    const { data } = await api.GET("/api/{user_id}/tasks/{task_id}/history", {
      params: { path: { user_id, task_id }, query: { as_of: "2026-11-24T10:00:00Z" } },
    });
    return data;
  },
  auditProof: async () => {
    const { data } = await api.GET("/api/{user_id}/audit-events/proof", {
      params: { path: { user_id } },
    });
    return data;
  },
  auditKeys: () => api.GET("/.well-known/audit-keys.json"),
  createStreamTicket: () =>
    api.POST("/api/{user_id}/events/tickets", { params: { path: { user_id } } }),
  // The stream itself is read with EventSource; the typed call documents its parameters.
  streamEvents: () =>
    api.GET("/api/{user_id}/events", {
      params: { path: { user_id }, query: { ticket: "t", after: 0 } },
      parseAs: "stream",
    }),
};

export default calls;
