-- Foundation: idempotency keys for creating writes, and the deployment probes of the system module.

-- A key is claimed in the same transaction as the write it protects, together with the answer given,
-- so a retry after an unknown outcome replays that answer instead of writing twice.
CREATE TABLE idempotency_keys (
    scope        text        NOT NULL,  -- the principal's account id, or 'public'
    key          text        NOT NULL,
    route        text        NOT NULL,
    request_hash bytea       NOT NULL,  -- SHA-256 of route, path parameters and the decoded body
    status       integer     NOT NULL,
    response     bytea       NOT NULL,  -- the answer, as the route's protobuf response message
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

CREATE TABLE system_probes (
    probe_id   uuid        PRIMARY KEY,
    note       text        NOT NULL CHECK (length(note) <= 200),
    created_at timestamptz NOT NULL,
    thread     integer     NOT NULL
);
