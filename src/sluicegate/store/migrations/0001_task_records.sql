-- One record per task, and every lifecycle event that made it.
--
-- The recorder folds events into sluicegate_tasks by precedence (status_key: a terminal state is
-- final, a later attempt supersedes an earlier one), so events applied in any order give the
-- same record; the primary key of sluicegate_task_events makes an at-least-once repeat a no-op.

CREATE TABLE sluicegate_tasks (
    task_id            text PRIMARY KEY,
    tenant             text NOT NULL DEFAULT '',
    action             text NOT NULL DEFAULT '',
    status             text NOT NULL,
    status_key         bigint NOT NULL,
    status_at          timestamptz NOT NULL,
    reason             text NOT NULL DEFAULT '',
    detail             text NOT NULL DEFAULT '',
    output             bytea,
    output_size        integer NOT NULL DEFAULT 0,
    error              text NOT NULL DEFAULT '',
    finished_at        timestamptz,
    attempts           integer NOT NULL DEFAULT 0,
    worker_id          text NOT NULL DEFAULT '',
    worker_attempt     integer NOT NULL DEFAULT 0,
    dispatcher_id      text NOT NULL DEFAULT '',
    dispatcher_attempt integer NOT NULL DEFAULT 0,
    submitted_at       timestamptz,
    first_assigned_at  timestamptz,
    started_at         timestamptz,
    started_attempt    integer NOT NULL DEFAULT 0,
    spec               bytea,
    payload_size       integer,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Listing recent tasks, pruning old ones, and filtering by status.
CREATE INDEX sluicegate_tasks_updated ON sluicegate_tasks (updated_at);
CREATE INDEX sluicegate_tasks_status_updated ON sluicegate_tasks (status, updated_at);

CREATE TABLE sluicegate_task_events (
    task_id       text NOT NULL,
    event_id      text NOT NULL,
    attempt       integer NOT NULL,
    kind          text NOT NULL,
    at            timestamptz NOT NULL,
    worker_id     text NOT NULL DEFAULT '',
    dispatcher_id text NOT NULL DEFAULT '',
    reason        text NOT NULL DEFAULT '',
    detail        text NOT NULL DEFAULT '',
    error         text NOT NULL DEFAULT '',
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, event_id)
);
