"""The llmopt command line: parses, calls the library, renders. Heavy imports stay inside commands."""
