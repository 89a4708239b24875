"""The Ultralytics plug-in: the YAML row (``yaml_rows``), the layer it becomes (``backbone``), the wrappers
installed through the one hook table (``hooks``), safe loading, release gates and the RevCol trainers."""
