"""The synthetic world's words: themed vocabularies (one per topic), filler words and the
templates item titles, descriptions and private notes are written from."""

from __future__ import annotations

# Themed vocabularies: single lowercase words, disjoint across themes and from the filler and
# template words below (tests check this), so every topic word in a text names its topic.
THEMES: dict[str, tuple[str, ...]] = {
    "cooking": (
        "recipe", "simmer", "braise", "risotto", "garlic", "oregano", "basil", "skillet",
        "dough", "pastry", "broth", "marinade", "caramelize", "whisk", "saffron", "paprika",
        "casserole", "dumpling", "lasagna", "vinaigrette", "souffle", "omelette", "brisket",
        "ladle", "oven", "spatula", "cinnamon", "nutmeg", "shallot", "parmesan", "ravioli",
        "stew", "tortilla", "chutney", "custard", "knead", "butter", "flour", "pesto", "gnocchi",
        "chef", "seasoning", "wok", "sauce",
    ),
    "astronomy": (
        "telescope", "galaxy", "nebula", "supernova", "comet", "asteroid", "orbit", "planet",
        "quasar", "pulsar", "eclipse", "constellation", "cosmos", "meteor", "observatory",
        "redshift", "exoplanet", "jupiter", "saturn", "venus", "lunar", "solar", "stellar",
        "gravity", "lightyear", "parsec", "cosmology", "andromeda", "orion", "interstellar",
        "celestial", "starlight", "zenith", "equinox", "aurora", "moon", "crater", "sunspot",
        "astrophysics", "satellite", "hubble", "astronomer",
    ),
    "jazz": (
        "saxophone", "trumpet", "bebop", "swing", "improvisation", "trombone", "clarinet",
        "bassist", "drummer", "ragtime", "blues", "quartet", "quintet", "bandleader", "coltrane",
        "ellington", "scat", "syncopation", "groove", "chord", "melody", "piano", "vibraphone",
        "nightclub", "speakeasy", "riff", "solo", "cornet", "gig", "jam", "harlem", "bossa",
        "rhythm", "tenor", "mingus", "armstrong", "jazz", "trio", "standards", "saxophonist",
    ),
    "football": (
        "goalkeeper", "striker", "midfielder", "defender", "penalty", "offside", "dribble",
        "tackle", "header", "freekick", "stadium", "referee", "league", "goal", "kickoff",
        "winger", "transfer", "derby", "hattrick", "fullback", "crossbar", "sweeper",
        "relegation", "manager", "supporters", "volley", "counterattack", "formation", "dugout",
        "anfield", "premier", "soccer", "touchline", "substitute", "halftime", "equaliser",
        "cup", "footballer", "midfield", "wembley", "uefa",
    ),
    "gardening": (
        "compost", "mulch", "seedling", "tulip", "rose", "perennial", "pruning", "trowel",
        "greenhouse", "soil", "fertilizer", "hedge", "lawn", "weeding", "orchid", "fern",
        "succulent", "bulbs", "daffodil", "hydrangea", "lavender", "shrub", "trellis",
        "allotment", "seeds", "watering", "blossom", "petal", "aphid", "rake", "hoe", "shears",
        "potting", "herbaceous", "begonia", "geranium", "marigold", "hosta", "topiary",
        "gardener", "flowerbed",
    ),
    "programming": (
        "compiler", "python", "javascript", "algorithm", "debugging", "function", "variable",
        "recursion", "database", "server", "api", "framework", "syntax", "runtime", "github",
        "refactoring", "kernel", "linux", "terminal", "script", "bytecode", "typescript",
        "docker", "kubernetes", "backend", "frontend", "microservice", "lambda", "repository",
        "commit", "pointer", "unittest", "iterator", "callback", "threading", "hashmap", "async",
        "deployment", "programmer", "software", "code",
    ),
    "medieval history": (
        "castle", "knight", "crusade", "monarch", "feudal", "manor", "abbey", "monk", "peasant",
        "serf", "sword", "armor", "siege", "joust", "dynasty", "cathedral", "plague", "chivalry",
        "vassal", "heraldry", "byzantine", "viking", "norman", "saxon", "charlemagne",
        "parchment", "scribe", "guild", "fiefdom", "lance", "moat", "drawbridge", "crossbow",
        "longbow", "baron", "duke", "kingdom", "throne", "medieval", "monastery", "squire",
    ),
    "marine life": (
        "coral", "reef", "dolphin", "whale", "shark", "octopus", "plankton", "jellyfish",
        "seahorse", "kelp", "tide", "lagoon", "starfish", "turtle", "squid", "ocean", "marine",
        "abyss", "snorkeling", "scuba", "mangrove", "barnacle", "manatee", "orca", "seal",
        "anemone", "urchin", "krill", "salinity", "seabed", "sonar", "submarine", "tuna",
        "walrus", "clownfish", "eel", "oyster", "lobster", "seaweed", "diver",
    ),
    "mountaineering": (
        "summit", "glacier", "crampons", "carabiner", "belay", "ascent", "everest", "himalaya",
        "altitude", "sherpa", "basecamp", "avalanche", "ridge", "crevasse", "harness",
        "climbing", "alpine", "expedition", "peak", "bivouac", "traverse", "scree", "couloir",
        "oxygen", "frostbite", "piton", "rappel", "matterhorn", "kilimanjaro", "snowfield",
        "headlamp", "mountaineer", "cliff", "boulder", "icefall", "mountain", "rope",
        "climber", "descent",
    ),
    "photography": (
        "camera", "lens", "aperture", "shutter", "exposure", "tripod", "darkroom", "zoom",
        "focus", "bokeh", "megapixel", "flash", "photograph", "snapshot", "viewfinder",
        "histogram", "polaroid", "telephoto", "wideangle", "macro", "mirrorless", "dslr",
        "nikon", "leica", "selfie", "lighting", "photographer", "sepia", "monochrome",
        "retouching", "photoshop", "negatives", "photo", "kodak", "shot", "framing", "backlit",
    ),
    "chess": (
        "checkmate", "gambit", "pawn", "rook", "bishop", "queen", "castling", "stalemate",
        "endgame", "sicilian", "grandmaster", "elo", "blitz", "tournament", "fianchetto",
        "zugzwang", "chessboard", "kasparov", "carlsen", "fischer", "tactics", "sacrifice",
        "promotion", "opponent", "middlegame", "chess", "check", "rating", "opening", "draw",
        "move", "board", "king", "capture", "fork", "pin", "gm",
    ),
    "fashion": (
        "runway", "couture", "designer", "fabric", "silk", "denim", "tailoring", "wardrobe",
        "boutique", "vogue", "hemline", "stiletto", "handbag", "jacket", "scarf", "trend",
        "catwalk", "sequin", "lace", "velvet", "cashmere", "accessories", "jewelry", "necklace",
        "sneakers", "blazer", "gown", "dress", "tuxedo", "stylist", "chanel", "gucci", "milan",
        "outfit", "seamstress", "embroidery", "fashion", "model", "style",
    ),
    "finance": (
        "stock", "bond", "dividend", "portfolio", "investor", "equity", "derivatives",
        "inflation", "mortgage", "bank", "loan", "credit", "budget", "savings", "pension",
        "market", "trading", "broker", "valuation", "liquidity", "recession", "currency",
        "bitcoin", "forex", "ledger", "accounting", "tax", "audit", "revenue", "profit",
        "earnings", "nasdaq", "wallstreet", "shares", "investment", "finance", "banker",
    ),
    "painting": (
        "canvas", "brushstroke", "watercolor", "acrylic", "palette", "easel", "pigment",
        "impressionism", "fresco", "mural", "sketch", "gallery", "monet", "rembrandt",
        "picasso", "cubism", "surrealism", "abstract", "masterpiece", "portrait", "varnish",
        "gouache", "charcoal", "renaissance", "baroque", "hue", "chiaroscuro", "painter",
        "brush", "oils", "painting", "vermeer", "landscape", "artist", "turner",
    ),
    "birdwatching": (
        "binoculars", "warbler", "heron", "sparrow", "finch", "owl", "eagle", "hawk",
        "migration", "plumage", "nest", "songbird", "robin", "woodpecker", "hummingbird",
        "kingfisher", "falcon", "pelican", "flamingo", "wren", "ornithology", "birding",
        "feeder", "feathers", "birdsong", "puffin", "egret", "osprey", "raptor", "chickadee",
        "starling", "hatchling", "beak", "wingspan", "aviary", "bird", "birdwatcher",
    ),
    "cycling": (
        "bicycle", "pedal", "peloton", "derailleur", "gears", "helmet", "saddle", "handlebar",
        "tandem", "velodrome", "criterium", "chain", "spokes", "cadence", "cyclist", "bike",
        "puncture", "tyre", "breakaway", "crankset", "commute", "gravel", "bmx", "cycling",
        "sprinter", "wheel", "rider", "mtb", "frame", "bikepacking", "cyclocross", "stage",
    ),
    "wine": (
        "vineyard", "grape", "merlot", "cabernet", "chardonnay", "sommelier", "vintage",
        "tannin", "cellar", "barrel", "oak", "riesling", "pinot", "bordeaux", "burgundy",
        "champagne", "prosecco", "decanter", "corkscrew", "bouquet", "winery", "terroir",
        "fermentation", "sauvignon", "malbec", "tasting", "acidity", "vintner", "sherry",
        "wine", "rioja", "syrah", "cork", "vines",
    ),
    "video games": (
        "console", "joystick", "gamer", "multiplayer", "playstation", "xbox", "nintendo",
        "level", "boss", "quest", "rpg", "arcade", "pixel", "speedrun", "esports",
        "controller", "respawn", "loot", "dungeon", "avatar", "sandbox", "minecraft", "zelda",
        "mario", "fortnite", "leaderboard", "glitch", "cheatcode", "achievement", "platformer",
        "shooter", "stealth", "gameplay", "npc", "videogame", "gaming",
    ),
    "fitness": (
        "yoga", "meditation", "pilates", "stretching", "workout", "cardio", "treadmill",
        "dumbbell", "squat", "pushup", "plank", "mindfulness", "breathing", "posture",
        "flexibility", "gym", "barbell", "protein", "marathon", "jogging", "calories",
        "kettlebell", "lunges", "abs", "biceps", "asana", "vinyasa", "fitness", "exercise",
        "running", "deadlift", "reps", "training",
    ),
    "paleontology": (
        "fossil", "dinosaur", "tyrannosaurus", "triceratops", "velociraptor", "jurassic",
        "cretaceous", "paleontologist", "excavation", "skeleton", "amber", "extinction",
        "stegosaurus", "brachiosaurus", "pterodactyl", "mammoth", "sediment", "trilobite",
        "ammonite", "bones", "carnivore", "herbivore", "prehistoric", "evolution",
        "archaeopteryx", "sabertooth", "dinosaurs", "fossils", "paleontology", "raptors",
    ),
    "railways": (
        "locomotive", "railway", "steam", "carriage", "station", "timetable", "conductor",
        "tracks", "signal", "diesel", "freight", "sleeper", "tunnel", "viaduct", "commuter",
        "express", "metro", "tram", "monorail", "shinkansen", "junction", "rails", "depot",
        "caboose", "ticket", "train", "trains", "railroad", "platform", "engine",
    ),
}

# Shared words that carry no topic (titles, descriptions): realistic noise for the encoder.
FILLER_ADJECTIVES = (
    "essential", "complete", "classic", "modern", "little", "great", "new", "hidden",
    "curious", "quiet", "bold", "gentle", "lost", "simple", "wonderful", "strange", "brief",
)
FILLER_NOUNS = (
    "guide", "story", "collection", "series", "introduction", "journey", "handbook",
    "companion", "account", "tale", "primer", "look", "notebook", "essay",
)
_TITLE_TEMPLATES = (
    "{A} and {B}", "The {A} {B}", "{A}: {a_adj} {adj} {noun}", "On {A} and {B}",
    "{A} of the {B}", "The {adj} {A}", "{A}, {B} and {C}", "{A_noun} {noun} of {A}",
)
_DESCRIPTION_TEMPLATES = (
    "{A_adj} {adj} {noun} about {w0}, {w1} and {w2}, with {w3}, {w4} and {w5}.",
    "{W0} meets {w1} in this {adj} {noun}: {w2}, {w3}, {w4} and {w5}.",
    "Everything about {w0} and {w1}. Covers {w2}, {w3}, {w4} and {w5}.",
    "{A_adj} {adj} {noun} of {w0}, {w1}, {w2} and {w3}, from {w4} to {w5}.",
)
# Private notes: short first-person sentences around words of the user's current topics.
_NOTE_TEMPLATES = (
    "loved the part about {a} and {b}",
    "more {a} please, the {b} bit was great",
    "can't stop thinking about {a} lately",
    "into {a} these days, and {b} too",
    "reminded me why I like {a}",
    "meh, but the {a} and {b} were good",
    "saving this for my {a} notes",
    "want to read up on {a} and {b} next",
    "finally something on {a}",
    "{a} again! also {b}",
)
