"""Reading a case in and writing its results out, as grand-challenge lays them out."""
