"""The producer: lists images under a prefix and feeds batches to the workers."""
