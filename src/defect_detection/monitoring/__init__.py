"""After deployment: the prediction log, the checks that notice when the line changes, and the
review queue that turns operators' verdicts into the next model's data."""
