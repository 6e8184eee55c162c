"""The feedback service: validated, de-duplicated, durably acknowledged user feedback."""
