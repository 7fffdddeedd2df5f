"""LoRA finetuning on the hierarchical VQA items (hierarchy-protocol.md sections 1.4 and 8).

Modules: `data` (items -> SFT conversations, splits, LLaVA format), `encode` (template-derived
assistant-only labels, batching), `model` (loading, LoRA targets = the language model's Linears),
`train` (the transformers Trainer), `merge` (standalone model in the training dtype, letter
log-probs), `serve` (vLLM `--enable-lora` flags), `compare` (base vs tuned through `harness run`),
`cli` (`harness finetune ...`). `data`, `serve`, `compare` and `cli` import without torch.
"""
