"""The change feed: each user's audit events streamed as Server-Sent Events as they commit."""
