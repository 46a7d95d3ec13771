"""What the tests share, once: waiting with deadlines, reading a stream back, scraping metrics,
starting and stopping role processes. Test modules import from here, never from each other."""
