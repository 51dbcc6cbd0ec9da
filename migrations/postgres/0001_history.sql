-- History that outlives the bus (SPEC §7). Never edit once landed: add a new numbered file.

-- Each room's current epoch and latest offset; `base_offset`: the epoch's own messages are
-- those after it (0 unless the epoch was renewed).
CREATE TABLE rooms (
    room        TEXT   NOT NULL PRIMARY KEY,
    epoch       TEXT   NOT NULL,
    head_offset BIGINT NOT NULL,
    base_offset BIGINT NOT NULL DEFAULT 0,
    updated_ms  BIGINT NOT NULL
);

-- One row per chat message; `frame` is the `message` frame byte for byte as delivered.
CREATE TABLE messages (
    room       TEXT   NOT NULL,
    epoch      TEXT   NOT NULL,
    msg_offset BIGINT NOT NULL,
    ts         BIGINT NOT NULL,
    user_id    TEXT   NOT NULL,
    client_ref TEXT,
    frame      TEXT   NOT NULL,
    PRIMARY KEY (room, epoch, msg_offset)
);

-- Retention deletes by time.
CREATE INDEX messages_ts ON messages (ts);
