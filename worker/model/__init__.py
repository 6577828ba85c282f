"""JoyCaption itself: loading and captioning, LoRA, preprocessing, the tiny test model, memory figures."""
