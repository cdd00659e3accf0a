"""`experiment=auto`: look at the data, pick a few readable candidates, train them under one
parent run within a time budget, choose on validation, report the winner's test numbers once."""
