"""Container images as VMs: a local store of images pulled from OCI registries or files.

``store``: the per-user store (content-addressed by manifest digest, a tag index, safe
under concurrent processes); ``pull``: skopeo -> umoci -> ext4 with the image's
ownership, modes and device nodes; ``config``: the image's config (Env, Entrypoint, ...).
Nothing here is on the ``pyvmm boot`` start-up path unless ``--image`` is given.
"""
