"""``offload serve``: plan the model for a batch of sequences, then serve it over HTTP."""


def cmd_serve(args, model_path) -> int:
    """``offload serve``: plan the model for ``--max-batch`` sequences of ``--max-context``
    positions inside the budget, then serve it until interrupted."""
    from ..errors import OffloadError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise OffloadError(f"offload serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'offload[serve]'") from None
    from ..serve import DEFAULT_CONTEXT, Engine, batched_options, create_app
    from .generate import Session

    context = args.max_context or DEFAULT_CONTEXT
    session = Session(args, model_path)
    kv = batched_options(args.max_batch, context)   # the manager's own paged KV, planned
    try:
        session.start(max_tokens=None, batch=kv.pop("batch"), **kv)
    except OffloadError as e:
        raise OffloadError(f"{e}. offload serve plans --max-batch x --max-context = "
                           f"{args.max_batch} x {context} positions: lower either, or raise "
                           "--budget") from None
    name = args.name or model_path.stem
    engine = Engine(session.model, session.tok, name, max_batch=args.max_batch,
                    context=context, queue=args.queue)
    print(f"offload: serving {name} on http://{args.host}:{args.port}/v1 (budget {args.budget}, "
          f"{args.max_batch} sequences x {context} positions, {args.queue} may wait"
          + (", API key required" if args.api_key else "") + ")", flush=True)
    try:
        uvicorn.run(create_app(engine, args.api_key), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        engine.close()
        session.close()
    return 0
