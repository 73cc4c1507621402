"""The OpenAI-compatible gateway: one folder per endpoint family (``router`` + ``protocol``); logic shared by
the generation endpoints in ``generation``, the error translation in ``errors``."""
