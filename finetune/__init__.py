"""LoRA finetuning on hierarchical VQA items (see the finetune issue)."""
