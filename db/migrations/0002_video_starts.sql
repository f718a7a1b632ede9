-- One row per video of an order: how many generate-video calls went out without an answer
-- that said whether the generation started, and the provider's file id once one did.
-- Written before each call, so a crash or a lost answer is known to the next attempt: the
-- activity then resumes the file, or starts again only while the policy allows
-- (VIDEO_START_ATTEMPTS), and never starts a video whose file it already knows.
CREATE TABLE IF NOT EXISTS video_starts (
    order_id            text        NOT NULL,
    video_index         integer     NOT NULL CHECK (video_index >= 0),
    unconfirmed_starts  integer     NOT NULL DEFAULT 0 CHECK (unconfirmed_starts >= 0),
    file_id             text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, video_index)
);
