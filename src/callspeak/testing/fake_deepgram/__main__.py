"""``python -m callspeak.testing.fake_deepgram --port N``: serve the fake (see :func:`main`)."""

from callspeak.testing.fake_deepgram import main

if __name__ == "__main__":
    main()
