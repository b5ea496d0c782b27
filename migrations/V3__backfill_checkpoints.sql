-- Where an interrupted backfill resumes.
--
-- A backfill walks the users in user id order, a batch per transaction, and
-- records here the last user up to which every batch has committed. Killed
-- half-way, the next run starts after that user; a finished run removes its
-- row. Rerunning from the start is also safe (it changes nothing already
-- right), only slower.
CREATE TABLE backfill_checkpoints (
    feature_name text        PRIMARY KEY REFERENCES features,
    last_user_id text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
