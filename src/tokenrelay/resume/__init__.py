"""Answers that outlive their connection: every streamed answer is written to a stream log
as it is relayed, so a client that reconnects — after a reload, a network switch, a proxy
cutting it — gets the rest with nothing lost and nothing twice, and anyone holding the
stream's id can stop the model (docs/resume.md).

``log.StreamLog`` holds one answer; ``registry.Streams`` holds this instance's streams, their
readers, the grace before an unread answer is given up, and their retention.
"""
