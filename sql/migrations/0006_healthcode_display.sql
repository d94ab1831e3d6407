-- Health code, display side: paper codes for people without phones (long-lived signed tokens) and their
-- revocation. The QR tokens of the app are not stored: they are signed on demand and cached (display.c).

-- One paper code: a token (typ hc+jwt, claim `paper` = paper_id) printed by counter staff, valid for days.
-- The token itself is not stored (the printout is the only copy; verification needs only the signature and
-- this row). revoked_at set = the code fails POST /v1/health/verify from then on; gateways keep the paper
-- ids they have seen, revoked or not, in memory (resynced from here by updated_at) so verification stays fast.
CREATE TABLE hc_paper_codes (
    paper_id    uuid        PRIMARY KEY,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    color       text        NOT NULL CHECK (color IN ('green', 'yellow', 'red')), -- printed on it
    issued_by   text        NOT NULL CHECK (length(issued_by) BETWEEN 1 AND 128), -- staff account id
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    revoked_by  text,
    updated_at  timestamptz NOT NULL DEFAULT now(),       -- moves on revocation: gateways resync by it
    CHECK (expires_at > issued_at),
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX hc_paper_codes_resident ON hc_paper_codes (resident_id);
-- What gateways load: paper codes revoked or changed recently, and not expired yet.
CREATE INDEX hc_paper_codes_updated ON hc_paper_codes (updated_at);
