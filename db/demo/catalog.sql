-- A small demo catalogue for the local stack and a fresh Supabase project: sixteen products in
-- English and Russian, stock with a few discounted units, and three products made to order by
-- a demo supplier. Does nothing when any product exists, so it is safe to run on every start
-- (workers/stack.py load_demo_catalog) or by hand in Supabase's SQL editor.
--
-- SANDBOX VALUES: the demo supplier's token is the public string "demo-supplier-token" (only
-- its sha256 is stored, as for every supplier), and the stock below is made-up keys and
-- example.com links. Never load this file into a shop that sells to real customers.
-- Prices are minor units of usd.
DO $$
DECLARE
    v_supplier bigint;
    v_product  bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM products) THEN
        RETURN;
    END IF;

    v_supplier := (admin_create_supplier(
        'Demo Studio',
        -- A chat in the sandbox's Telegram, where the supplier is told of paid orders.
        100000001,
        encode(sha256(convert_to('demo-supplier-token', 'UTF8')), 'hex')) ->> 'id')::bigint;

    v_product := (admin_create_product(
        'Pitch deck template / Шаблон презентации для инвесторов',
        'A 20-slide investor pitch deck for Google Slides and PowerPoint, with charts and '
        || 'icons. / Презентация для инвесторов на 20 слайдов для Google Slides и PowerPoint, '
        || 'с диаграммами и иконками.',
        1500, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '["https://example.com/demo/pitch-deck?key=DEMO-PD-0001"]', 20);
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/pitch-deck?key=DEMO-PD-0002",
        "https://example.com/demo/pitch-deck?key=DEMO-PD-0003",
        "https://example.com/demo/pitch-deck?key=DEMO-PD-0004",
        "https://example.com/demo/pitch-deck?key=DEMO-PD-0005"]');

    v_product := (admin_create_product(
        'Notion life planner / Планер жизни в Notion',
        'Goals, habits, weekly reviews and a reading list in one Notion template. / Цели, '
        || 'привычки, недельные обзоры и список книг в одном шаблоне Notion.',
        900, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '["https://example.com/demo/notion-planner?key=DEMO-NP-0001"]', 30);
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/notion-planner?key=DEMO-NP-0002",
        "https://example.com/demo/notion-planner?key=DEMO-NP-0003",
        "https://example.com/demo/notion-planner?key=DEMO-NP-0004",
        "https://example.com/demo/notion-planner?key=DEMO-NP-0005",
        "https://example.com/demo/notion-planner?key=DEMO-NP-0006"]');

    v_product := (admin_create_product(
        'VPN gift key, 1 month / Подарочный ключ VPN на 1 месяц',
        'A one-month key for a VPN service, up to 5 devices. / Ключ на один месяц для '
        || 'VPN-сервиса, до 5 устройств.',
        700, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "DEMO-VPN-7F3K-0001", "DEMO-VPN-7F3K-0002", "DEMO-VPN-7F3K-0003", "DEMO-VPN-7F3K-0004"]');

    v_product := (admin_create_product(
        'Streaming gift card, 1 month / Подарочная карта стриминга на 1 месяц',
        'One month of a video streaming subscription, activated with a code. / Месяц '
        || 'подписки на видеостриминг, активируется кодом.',
        1200, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '["DEMO-STREAM-Q8Z2-0001"]', 10);
    PERFORM admin_add_stock(v_product, '["DEMO-STREAM-Q8Z2-0002", "DEMO-STREAM-Q8Z2-0003"]');

    v_product := (admin_create_product(
        'Midjourney prompt pack: product photos / Набор промптов Midjourney: предметная съёмка',
        '100 tested prompts for studio product shots, lifestyle scenes and packaging. / 100 '
        || 'проверенных промптов для студийной съёмки товаров, lifestyle-сцен и упаковки.',
        500, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0001",
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0002",
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0003",
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0004",
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0005",
        "https://example.com/demo/prompts-product?key=DEMO-MJ-0006"]');

    v_product := (admin_create_product(
        'ChatGPT prompt pack for marketers / Набор промптов ChatGPT для маркетологов',
        '60 prompts for ad copy, email campaigns and content plans. / 60 промптов для '
        || 'рекламных текстов, email-рассылок и контент-планов.',
        400, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/prompts-marketing?key=DEMO-GPT-0001",
        "https://example.com/demo/prompts-marketing?key=DEMO-GPT-0002",
        "https://example.com/demo/prompts-marketing?key=DEMO-GPT-0003"]');

    PERFORM admin_create_product(
        'Logo design, made to order / Дизайн логотипа на заказ',
        'A designer draws your logo from your brief: three concepts, then the chosen one in '
        || 'SVG and PNG. / Дизайнер рисует логотип по вашему брифу: три концепции, затем '
        || 'выбранная в SVG и PNG.',
        4900, 'usd', true, 48, v_supplier);

    PERFORM admin_create_product(
        'Notion workspace setup, made to order / Настройка рабочего пространства Notion на заказ',
        'Your team''s Notion workspace built to your processes: projects, docs and a wiki. / '
        || 'Рабочее пространство Notion под процессы вашей команды: проекты, документы и вики.',
        3900, 'usd', true, 72, v_supplier);
    v_product := (admin_create_product(
        'Excel budget tracker / Таблица учёта бюджета в Excel',
        'Monthly income and expenses, savings goals and charts in one spreadsheet. / '
        || 'Доходы и расходы по месяцам, цели накоплений и графики в одной таблице.',
        600, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/budget?key=DEMO-XL-0001",
        "https://example.com/demo/budget?key=DEMO-XL-0002",
        "https://example.com/demo/budget?key=DEMO-XL-0003"]');

    v_product := (admin_create_product(
        'Resume template / Шаблон резюме',
        'A one-page CV in Word and Google Docs that passes applicant tracking systems. / '
        || 'Резюме на одну страницу в Word и Google Docs, которое проходит ATS-фильтры.',
        300, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/resume?key=DEMO-CV-0001",
        "https://example.com/demo/resume?key=DEMO-CV-0002",
        "https://example.com/demo/resume?key=DEMO-CV-0003"]');

    v_product := (admin_create_product(
        'Instagram post templates / Шаблоны постов для Instagram',
        '50 editable Canva templates for posts and stories. / 50 редактируемых шаблонов '
        || 'Canva для постов и сторис.',
        800, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/insta?key=DEMO-IG-0001",
        "https://example.com/demo/insta?key=DEMO-IG-0002"]');

    v_product := (admin_create_product(
        'English course for beginners / Курс английского для начинающих',
        'Thirty video lessons with exercises, from the alphabet to everyday conversations. / '
        || 'Тридцать видеоуроков с упражнениями, от алфавита до разговоров на каждый день.',
        2500, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/english?key=DEMO-EN-0001",
        "https://example.com/demo/english?key=DEMO-EN-0002"]');

    v_product := (admin_create_product(
        'Antivirus license, 1 year / Лицензия антивируса на 1 год',
        'Protection for one computer or phone against viruses and phishing. / Защита '
        || 'одного компьютера или телефона от вирусов и фишинга.',
        1900, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '["DEMO-AV-9K2M-0001", "DEMO-AV-9K2M-0002"]');

    v_product := (admin_create_product(
        'Lightroom presets pack / Набор пресетов для Lightroom',
        '25 presets for warm portraits, travel photos and film looks. / 25 пресетов для '
        || 'тёплых портретов, фото из путешествий и плёночного стиля.',
        450, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/presets?key=DEMO-LR-0001",
        "https://example.com/demo/presets?key=DEMO-LR-0002"]');

    v_product := (admin_create_product(
        'Music for videos, royalty free / Музыка для видео без авторских отчислений',
        'Twenty background tracks licensed for YouTube and ads. / Двадцать фоновых треков '
        || 'с лицензией для YouTube и рекламы.',
        1100, 'usd', false, NULL, NULL) ->> 'id')::bigint;
    PERFORM admin_add_stock(v_product, '[
        "https://example.com/demo/music?key=DEMO-MU-0001",
        "https://example.com/demo/music?key=DEMO-MU-0002"]');

    PERFORM admin_create_product(
        'Website landing page, made to order / Лендинг под ключ на заказ',
        'A one-page website for your product, designed and built from your texts. / '
        || 'Одностраничный сайт для вашего продукта: дизайн и вёрстка по вашим текстам.',
        9900, 'usd', true, 120, v_supplier);
END $$;
