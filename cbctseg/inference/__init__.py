"""One case's path: preprocess, windows and schedule, sliding window, stitching, finalize, post-process."""
