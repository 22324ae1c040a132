"""The package version, in a module of its own so that any layer can read it without importing the package."""

__version__ = "0.1.0"

# What a saved adapter_config.json records as ``peft_version``: the PEFT release whose format it is
# written in, then the writer after "@" (PEFT parses only the part before "@", as for its own builds
# from git), so PEFT's version checks see a real PEFT version and nothing warns on load.
PEFT_FORMAT_VERSION = "0.21.2"
BONE_FORMAT_VERSION = "0.18.1"  # the last PEFT release with Bone
PEFT_VERSION_RECORD = f"{PEFT_FORMAT_VERSION}@deltatune-{__version__}"
