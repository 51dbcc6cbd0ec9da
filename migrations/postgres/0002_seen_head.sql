-- The archive's order between epochs and what Redis had (docs/design.md, "The archive").
-- `seen_offset`: the newest offset of the epoch the writer saw handed out (Redis's head at the
-- archiver's claim), at or above `head_offset`: a room is never seeded at or below it in the
-- epoch. `seen_at_ms`: the writer's clock when it saw the head (Redis's TIME at the claim): a
-- head of another epoch replaces the row only if it is not older. Rows written before this
-- migration saw what they copied, at no known time.
ALTER TABLE rooms ADD COLUMN seen_offset BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rooms ADD COLUMN seen_at_ms BIGINT NOT NULL DEFAULT 0;
UPDATE rooms SET seen_offset = head_offset;
