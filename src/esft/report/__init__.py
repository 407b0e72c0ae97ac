"""Tables and figures made by commands, so every number in a report can be regenerated."""
