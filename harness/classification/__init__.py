"""VLMs as image classifiers (classification-protocol.md): generation, log-likelihood, ImageWikiQA.

One module per concept: `datasets` (image lists, class lists, ImageWikiQA), `prompts` (templates and
candidate streams), `scoring` (name matching), `metrics`, `mapping` (free-form answer -> label set),
`loop` (the bounded streaming request loop), `generation`, `loglik`, `wikiqa`, `frequency`.
Nothing here imports torch unless a torch-backed feature (NLI / embedding mapping) is used.
"""
