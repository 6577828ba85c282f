"""Running the service: job control, local Redis, child supervision, Flower and `up`, the demo."""
