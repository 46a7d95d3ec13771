"""The checkpoint/recovery controller: consistent checkpoints and automatic recovery."""
