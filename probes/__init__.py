"""Hidden-state features and linear probes: where in a VLM is the hierarchy lost?

- `probes.arch` + `architectures.toml`: hook points per architecture (vision, projector, llm.K);
- `probes.hooks`: forward hooks that record sites in one forward pass, and the pooling;
- `probes.recipes` + `recipes.toml`: the reference prompts, sites, pools and image-size rules;
- `probes.imaging`: the Qwen smart-resize and longest-side cap;
- `probes.data`: probing inputs (image JSONL + taxonomy; text-probing sentences);
- `probes.store`: sharded float16 feature store, written as it goes, resumable;
- `probes.extract`: the extractor and the batched, prefetching extraction loop;
- `probes.train`: per-level probes, epoch selection, probe HCA via harness.metrics.hierarchy;
- `probes.cli`: `harness probe extract | text | train | info`.
"""
