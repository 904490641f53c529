"""Where stattn meets diffusers: the attention processors that route cross-attention through the
op (``processors``, ``ip_adapter``), the controller interface and step tracking (``control``,
``pipeline_calls``), the minimal UNet runner (``runner``), model loading (``models``), tokens
(``tokens``) and the attention-map recorder (``maps``)."""
