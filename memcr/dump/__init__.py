"""The dump file: its format, the writers (plain or spliced, framed) and the reader."""
