"""The archive format: record lines (encode, decode), the C encoder's face, the reader, UUIDs."""
