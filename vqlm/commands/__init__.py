"""One module per `vqlm` subcommand: argument parsing only; the work lives in the library."""

# name -> (module, one-line description)
COMMANDS = {
  "train": ("vqlm.commands.train", "train a stage (image tokenizer or LM) from a config"),
  "eval": ("vqlm.commands.evaluate", "run a run's evaluators; results to RUN/eval.json"),
  "encode": ("vqlm.commands.encode", "encode a data set into code shards with a tokenizer run"),
  "text": ("vqlm.commands.text", "train the SentencePiece model of a data set's captions"),
  "generate": ("vqlm.commands.generate", "draw images from text prompts with an LM run"),
  "caption": ("vqlm.commands.caption", "describe images with an LM run"),
  "continue": ("vqlm.commands.continue_", "continue interleaved text + images or a video clip"),
  "report": ("vqlm.commands.report", "write RUN/report.html: a run's curves, evaluations, samples"),
  "demo": ("vqlm.commands.demo", "the built-in end-to-end demo on the shapes data"),
  "latent": ("vqlm.commands.latent", "latent-space tools: neighbors|interpolate|attribute|sample"),
  "info": ("vqlm.commands.info", "a config's model and its parameter count"),
  "compile": ("vqlm.commands.compile", "compile a train step ahead of time; memory per device"),
  "import": (
    "vqlm.commands.interop",
    "a public checkpoint (Chameleon, Janus, Llama, VQModel) as a run",
  ),
  "export": ("vqlm.commands.interop", "an LM run as a public checkpoint (--format llama)"),
  "bench": ("vqlm.bench.__main__", "benchmarks against baselines (vqlm bench lm|sample|...)"),
}
