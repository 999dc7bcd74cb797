"""llmbatch inside data jobs: :mod:`llmbatch.integrations.pandas` (a DataFrame call and a
``df.llm`` accessor) and :mod:`llmbatch.integrations.ray` (Ray Data workers sharing one
quota). Each needs its extra (``pip install 'llmbatch[pandas]'`` / ``'llmbatch[ray]'``)
and is imported only when used."""
