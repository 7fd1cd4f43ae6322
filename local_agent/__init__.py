"""The Local Agent: runs vLLM (or fronts other OpenAI-compatible) workers on a GPU host and announces them to the
router."""
