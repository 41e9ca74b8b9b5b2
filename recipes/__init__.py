"""The recipes shipped with peftlab, installed with it as the package ``peftlab.recipes``: a quickstart recipe for
each workflow, the DeepSpeed configs (``deepspeed/``), a SLURM script (``slurm/``) and the scripts that generate
the quickstart data sets (``make_*_data.py``). Code finds them through :mod:`peftlab.recipe.shipped`, so they are
there from a wheel as from a source checkout."""
