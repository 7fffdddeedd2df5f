"""VLMs as image classifiers (classification-protocol.md): generation, log-likelihood, ImageWikiQA.

One module per concept: `datasets` (image lists, class lists, ImageWikiQA), `prompts` (templates and
candidate streams), `scoring` (name matching), `metrics`, `mapping` (free-form answer -> label set),
`generation`, `loglik`, `wikiqa` (engine tasks: harness.engine.core),
`frequency`. The run lifecycle is harness.runs (harness.runs.classification: settings, units, summaries).
Nothing here imports torch unless a torch-backed feature (NLI / embedding mapping) is used.
"""
