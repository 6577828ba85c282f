"""What a caption is asked with and judged by: prompts, the request, the model spec, quality rules."""
