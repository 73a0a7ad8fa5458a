"""Ray and storage: the caption pipeline, fine-tuning driver, data preparation."""
