"""Data: sources (one module per dataset source -> listings), preprocess (pure image functions), splits,
materialize (Spark -> Petastorm), loader (Petastorm -> tf.data), synthetic (the built-in phantom set)."""
import warnings

# petastorm 0.13.1 drives pyarrow 14's legacy ParquetDataset API (the one version pair that works together):
# its deprecation notices fire on every row group read and say nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(legacy|ParquetDataset|pyarrow\.filesystem).*")
