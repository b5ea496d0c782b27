-- Whether $1 names a known feature.
SELECT EXISTS (SELECT FROM features WHERE feature_name = $1)
