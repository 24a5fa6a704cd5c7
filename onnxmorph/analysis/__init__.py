"""Reading a model's structure: channel coupling (`channels` and its rules, `sizes`), transformer blocks
and attention, and growing what a coupling touches (`channel_edits`, `averaging`)."""
