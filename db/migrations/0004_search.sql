-- Product search for the sales assistant: full text (Russian, English and exact words),
-- trigrams for typos in names, and pgvector embeddings, ranked together by reciprocal rank
-- fusion. Embeddings are made outside the database (activities/search.py) by the model the
-- caller names; each row records that model and a hash of the text it embedded, so a
-- product whose text changed, or that another model embedded, is embedded again.
--
-- Refusals: SQLSTATE P0001, MESSAGE = a stable code, DETAIL = a sentence (as in 0003).

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- The text a product is found by (and embedded from).
CREATE OR REPLACE FUNCTION shop_internal.product_text(p_name text, p_description text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT p_name || E'\n' || coalesce(p_description, '')
$$;

ALTER TABLE products ADD COLUMN IF NOT EXISTS search_tsv tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('simple', name), 'A')
    || setweight(to_tsvector('russian', name), 'A')
    || setweight(to_tsvector('english', name), 'A')
    || setweight(to_tsvector('russian', coalesce(description, '')), 'C')
    || setweight(to_tsvector('english', coalesce(description, '')), 'C')
    || setweight(to_tsvector('simple', coalesce(description, '')), 'D')
) STORED;

CREATE INDEX IF NOT EXISTS products_search_tsv_idx ON products USING gin (search_tsv);
CREATE INDEX IF NOT EXISTS products_name_trgm_idx ON products USING gin (name gin_trgm_ops);
CREATE INDEX IF NOT EXISTS products_embedding_idx ON products
    USING hnsw (embedding vector_cosine_ops);

-- One product of the view as the catalog shows it (GET /api/shop/products, the tools).
CREATE OR REPLACE FUNCTION shop_internal.product_json(
    v public.available_stock_with_discounts, p_stars_per_unit numeric)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', v.product_id,
        'name', v.name,
        'description', v.description,
        'price', v.price,
        'final_price', v.final_price,
        'discount_percent', v.discount_percent,
        'currency', v.currency,
        'price_stars', public.stars_for_amount(v.final_price, p_stars_per_unit),
        'available', v.available,
        'made_to_order', v.made_to_order,
        'fulfillment_time_hours', v.fulfillment_time_hours)
$$;

CREATE OR REPLACE FUNCTION shop_catalog(p_stars_per_unit numeric)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(shop_internal.product_json(v, p_stars_per_unit)
                              ORDER BY v.product_id), '[]'::jsonb)
    FROM available_stock_with_discounts v
    WHERE v.status = 'active'
$$;

-- The customer's words as a tsquery that matches any of them, in each language's stemming.
CREATE OR REPLACE FUNCTION shop_internal.any_words(p_config regconfig, p_query text)
RETURNS tsquery LANGUAGE sql IMMUTABLE AS $$
    SELECT nullif(replace(plainto_tsquery(p_config, p_query)::text, ' & ', ' | '), '')::tsquery
$$;

-- Active products best first, each as the catalog shows it plus its fused `score`. A null
-- p_embedding (or one from another model than the rows') ranks by text alone.
CREATE OR REPLACE FUNCTION search_products(
    p_query text, p_embedding vector(384), p_model text, p_limit integer,
    p_stars_per_unit numeric)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_query tsquery;
BEGIN
    IF p_query IS NULL OR btrim(p_query) = '' OR length(p_query) > 500 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The search needs words (at most 500 characters).';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 50 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The limit must be between 1 and 50.';
    END IF;
    IF p_stars_per_unit IS NULL OR p_stars_per_unit <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The Stars rate must be positive.';
    END IF;
    v_query := coalesce(shop_internal.any_words('russian', p_query), ''::tsquery)
        || coalesce(shop_internal.any_words('english', p_query), ''::tsquery)
        || coalesce(shop_internal.any_words('simple', p_query), ''::tsquery);
    RETURN (
        WITH active AS (
            SELECT * FROM products WHERE status = 'active'
        ),
        by_text AS (
            SELECT id, row_number() OVER (ORDER BY ts_rank_cd(search_tsv, v_query) DESC, id) AS r
            FROM active WHERE search_tsv @@ v_query
            ORDER BY r LIMIT 50
        ),
        by_typo AS (
            SELECT id, row_number() OVER (
                       ORDER BY word_similarity(lower(p_query), lower(name)) DESC, id) AS r
            FROM active WHERE word_similarity(lower(p_query), lower(name)) >= 0.35
            ORDER BY r LIMIT 50
        ),
        by_meaning AS (
            SELECT id, row_number() OVER (ORDER BY embedding <=> p_embedding, id) AS r
            FROM active
            WHERE p_embedding IS NOT NULL AND embedding IS NOT NULL AND embedding_model = p_model
            ORDER BY r LIMIT 50
        ),
        fused AS (
            -- Reciprocal rank fusion (k = 60): agreement between the rankings wins.
            SELECT id, sum(1.0 / (60 + r)) AS score
            FROM (SELECT * FROM by_text UNION ALL SELECT * FROM by_typo
                  UNION ALL SELECT * FROM by_meaning) ranked
            GROUP BY id
            ORDER BY score DESC, id
            LIMIT p_limit
        )
        SELECT coalesce(jsonb_agg(shop_internal.product_json(v, p_stars_per_unit)
                                  || jsonb_build_object('score', round(f.score, 6))
                                  ORDER BY f.score DESC, f.id), '[]'::jsonb)
        FROM fused f JOIN available_stock_with_discounts v ON v.product_id = f.id
    );
END $$;

-- Products whose embedding is missing, from another model, or of a text since changed.
CREATE OR REPLACE FUNCTION products_to_embed(p_model text, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'text', text, 'text_hash', hash)
                              ORDER BY id), '[]'::jsonb)
    FROM (
        SELECT id, t.text, md5(t.text) AS hash
        FROM products p, LATERAL (SELECT shop_internal.product_text(p.name, p.description)
                                  AS text) t
        WHERE p.embedding IS NULL
           OR p.embedding_model IS DISTINCT FROM p_model
           OR p.embedded_text_hash IS DISTINCT FROM md5(t.text)
        ORDER BY id
        LIMIT greatest(1, least(coalesce(p_limit, 64), 500))
    ) todo
$$;

-- Stores an embedding only if the product's text is still the one embedded: an edit made
-- meanwhile wins, and the next refresh embeds the new text.
CREATE OR REPLACE FUNCTION set_product_embedding(
    p_product_id bigint, p_model text, p_text_hash text, p_embedding vector(384))
RETURNS jsonb LANGUAGE sql AS $$
    WITH stored AS (
        UPDATE products
        SET embedding = p_embedding, embedding_model = p_model, embedded_text_hash = p_text_hash
        WHERE id = p_product_id AND p_embedding IS NOT NULL AND p_model IS NOT NULL
          AND md5(shop_internal.product_text(name, description)) = p_text_hash
        RETURNING id
    )
    SELECT jsonb_build_object('stored', EXISTS (SELECT 1 FROM stored))
$$;

-- As in 0003: only the owner and Supabase's service_role reach these.
CALL shop_internal.service_role_only(ARRAY[
    'FUNCTION search_products(text, vector, text, integer, numeric)',
    'FUNCTION products_to_embed(text, integer)',
    'FUNCTION set_product_embedding(bigint, text, text, vector)',
    'FUNCTION shop_internal.product_text(text, text)',
    'FUNCTION shop_internal.product_json(available_stock_with_discounts, numeric)',
    'FUNCTION shop_internal.any_words(regconfig, text)']);
