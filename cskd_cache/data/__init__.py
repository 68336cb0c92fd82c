"""Images and views: random-access sources (ImageFolder, WebDataset), the view plan and its
training order, the augmentation recipe, replay, and the fingerprints that check a replay."""
