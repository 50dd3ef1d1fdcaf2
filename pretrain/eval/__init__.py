"""The eval stage: which models (``sources``), windows and lengths (``windows``), how ranks share the work
(``split``), perplexity by length and position (``perplexity``), passkey retrieval (``passkey``), and what
it leaves (``report``, ``plots``); ``run`` chains them."""
