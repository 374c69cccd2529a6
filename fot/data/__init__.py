"""Data the package ships: the worked-example pool FoT retrieves from for math input augmentation."""
